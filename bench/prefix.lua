-- wrk script of `python -m bench prefix` part 2: POST the chat bodies of BENCH_BODIES (one JSON
-- per line) in turn, and write {"requests": N, "errors": M} to BENCH_OUT at the end.
local bodies = {}
for line in io.lines(os.getenv("BENCH_BODIES")) do
  if #line > 0 then table.insert(bodies, line) end
end
local headers = { ["Content-Type"] = "application/json" }

local thread_count = 0
function setup(thread)
  thread_count = thread_count + 1
  thread:set("offset", thread_count * 17)
end

local n = 0
function request()
  n = n + 1
  return wrk.format("POST", "/v1/chat/completions", headers, bodies[(n + offset) % #bodies + 1])
end

function done(summary, latency, requests)
  local e = summary.errors
  local out = assert(io.open(os.getenv("BENCH_OUT"), "w"))
  out:write(string.format('{"requests":%d,"errors":%d}\n', summary.requests,
    e.connect + e.read + e.write + e.status + e.timeout))
  out:close()
end
