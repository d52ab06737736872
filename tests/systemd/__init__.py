"""Tests that boot a real systemd 252 in systemd-nspawn (marker: systemd)."""
