-- wrk script of the vfgen benchmark: what each connection sends, and a JSON summary at the end.
--
-- Environment (set by bench/wrk.py):
--   BENCH_MODE    static | mix | shapes
--   BENCH_OUT     file the JSON summary is written to
--   BENCH_PORTS   optional "p1 p2 ...": thread i connects to 127.0.0.1:p[i] (direct-to-backend path)
--   BENCH_MODEL   value of the "model" field
--   BENCH_LONG    mix mode: fraction of long (streamed) requests
--   BENCH_SHAPES  shapes mode: number of distinct label sets used
--   BENCH_AUTHORIZATION  optional Authorization header on every request (LiteLLM needs its master key)

local mode = os.getenv("BENCH_MODE") or "static"
local model = os.getenv("BENCH_MODEL") or "bench-model"
local json_headers = { ["Content-Type"] = "application/json" }
local authorization = os.getenv("BENCH_AUTHORIZATION")
if authorization and authorization ~= "" then
  json_headers["Authorization"] = authorization
  wrk.headers["Authorization"] = authorization
end

local ports = {}
for port in string.gmatch(os.getenv("BENCH_PORTS") or "", "%d+") do
  table.insert(ports, port)
end

local thread_count = 0
function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_id", thread_count)
  if #ports > 0 then
    thread.addr = wrk.lookup("127.0.0.1", ports[(thread_count - 1) % #ports + 1])[1]
  end
end

-- Realistic GLiNER label sets: short and similar, the case NOTES.md says hashes badly.
local label_sets = {
  '"person","organization"', '"person","location"', '"organization","location"', '"date","time"',
  '"person","organization","location"', '"disease","drug","symptom"', '"gene","protein"',
  '"company","product"', '"city","country"', '"email","phone number"', '"money","percent"',
  '"event","date"', '"law","court"', '"movie","actor","director"', '"book","author"',
  '"team","player"', '"vehicle","brand"', '"food","ingredient"', '"skill","job title"',
  '"university","degree"', '"chemical","reaction"', '"language","nationality"',
  '"software","version"', '"address","postal code"',
}
local words = { "Marie", "Curie", "worked", "at", "the", "University", "of", "Paris", "Apple", "opened",
  "a", "store", "in", "Berlin", "on", "May", "Aspirin", "relieves", "headache", "and", "fever" }

local function completion(stream)
  local body = '{"model":"' .. model .. '","prompt":"Summarise the report in one line.","max_tokens":16'
  if stream then body = body .. ',"stream":true' end
  return wrk.format("POST", "/v1/completions", json_headers, body .. "}")
end

local function sentence(n)
  local out = {}
  for i = 1, n do out[i] = words[math.random(#words)] end
  return table.concat(out, " ") .. " #" .. math.random(1000000)
end

if mode == "static" then
  -- One fixed small JSON request, formatted once: the cheapest client possible.
  wrk.method = "POST"
  wrk.path = "/v1/embeddings"
  wrk.headers["Content-Type"] = "application/json"
  wrk.body = '{"model":"' .. model .. '","input":"The quick brown fox jumps over the lazy dog."}'
elseif mode == "mix" then
  local long_fraction = tonumber(os.getenv("BENCH_LONG") or "0.2")
  local short_request, long_request
  function init(args)
    math.randomseed(1000 + thread_id)  -- the same sequence for every dispatcher
    short_request = completion(false)
    long_request = completion(true)
  end
  function request()
    if math.random() < long_fraction then return long_request end
    return short_request
  end
elseif mode == "shapes" then
  local shape_count = math.min(tonumber(os.getenv("BENCH_SHAPES") or "16"), #label_sets)
  function init(args)
    math.randomseed(2000 + thread_id)
  end
  function request()
    local shape = math.random(shape_count)
    local body = '{"model":"' .. model .. '","data":{"text":"' .. sentence(12) .. '","labels":['
      .. label_sets[shape] .. '],"threshold":0.3}}'
    local headers = { ["Content-Type"] = "application/json", ["X-Test-Key"] = "shape-" .. shape }
    if json_headers["Authorization"] then headers["Authorization"] = json_headers["Authorization"] end
    return wrk.format("POST", "/pooling", headers, body)
  end
else
  error("unknown BENCH_MODE " .. mode)
end

function done(summary, latency, requests)
  local e = summary.errors
  local points = {}
  for _, p in ipairs({ 1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99, 99.9 }) do
    table.insert(points, string.format("[%g,%d]", p, latency:percentile(p)))
  end
  local out = assert(io.open(os.getenv("BENCH_OUT"), "w"))
  out:write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"latency_us":{"min":%d,"mean":%.1f,"max":%d,"percentiles":[%s]}}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.max, table.concat(points, ",")))
  out:close()
end
