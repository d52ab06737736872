"""libpcre2-8, the library Debian's nginx links, called in-process through ctypes.

For checks of vfgen's nginx patterns that need PCRE2's own error codes and limits
(heap, match, JIT stack) without an nginx round trip.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass

ERROR_NOMATCH = -1
ERROR_JIT_STACKLIMIT = -46
ERROR_MATCHLIMIT = -47
ERROR_HEAPLIMIT = -63
_UNSET = 2**64 - 1


def _library() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("pcre2-8") or "libpcre2-8.so.0")
    lib.pcre2_compile_8.restype = ctypes.c_void_p
    lib.pcre2_compile_8.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint32, ctypes.POINTER(ctypes.c_int),
                                    ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p]
    lib.pcre2_match_data_create_from_pattern_8.restype = ctypes.c_void_p
    lib.pcre2_match_data_create_from_pattern_8.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.pcre2_match_8.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                                  ctypes.c_uint32, ctypes.c_void_p, ctypes.c_void_p]
    lib.pcre2_jit_compile_8.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.pcre2_get_ovector_pointer_8.restype = ctypes.POINTER(ctypes.c_size_t)
    lib.pcre2_get_ovector_pointer_8.argtypes = [ctypes.c_void_p]
    return lib


_LIB = None


@dataclass
class Pattern:
    code: int
    data: int

    def match(self, subject: bytes) -> tuple[int, bytes | None]:
        """(pcre2_match's return code, group 1 or None)."""
        rc = _LIB.pcre2_match_8(self.code, subject, len(subject), 0, 0, self.data, None)
        group = None
        if rc > 0:
            ov = _LIB.pcre2_get_ovector_pointer_8(self.data)
            # The capture of the deployment's "model" group is the last group.
            last = rc - 1
            if last >= 1 and ov[2 * last] != _UNSET:
                group = subject[ov[2 * last]:ov[2 * last + 1]]
        return rc, group


def compile(pattern: str, jit: bool = False) -> Pattern:
    global _LIB
    if _LIB is None:
        _LIB = _library()
    err, offset = ctypes.c_int(), ctypes.c_size_t()
    raw = pattern.encode()
    code = _LIB.pcre2_compile_8(raw, len(raw), 0, ctypes.byref(err), ctypes.byref(offset), None)
    if not code:
        raise ValueError(f"PCRE2 error {err.value} at offset {offset.value}: {pattern[max(0, offset.value - 40):offset.value]!r}")
    # nginx 1.22 JIT-compiles with PCRE2_JIT_COMPLETE and gives no JIT stack: the 32 KB default, as here.
    if jit and _LIB.pcre2_jit_compile_8(code, 1) != 0:
        raise ValueError("JIT compilation failed")
    return Pattern(code, _LIB.pcre2_match_data_create_from_pattern_8(code, None))
