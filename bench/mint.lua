-- wrk script for the benchmark (python -m bench).
--
--   wrk ... -s bench/mint.lua URL -- TOKENS_FILE THREADS [FIRST COUNT]
--       POST {"token": ...}, one unused token per request, from lines FIRST .. FIRST + COUNT - 1 (0-based,
--       blank lines not counted) of TOKENS_FILE, or from all of it
--   BENCH_DELAY_MS=D wrk ...
--       each connection waits D ms between an answer and its next request: the paced runs, at a fraction of
--       the peak rate (an environment variable, because wrk decides whether delay() exists before init())
--   wrk ... -s bench/mint.lua URL
--       plain requests (GET /livez), statuses counted only
--
-- Every response's status is counted, because wrk itself only reports statuses > 399 and a benchmark that
-- quietly measures error responses measures the wrong thing. A token must never be sent twice (the gateway
-- answers a replay with 422), so a thread that runs out stops and says so instead of reusing one.

local threads = {}
local next_id = 0

function setup(thread)
  -- setup() runs in the main Lua state: number the threads so each takes a disjoint share of the tokens.
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

-- Per-thread state (each wrk thread has its own Lua state).
tokens = nil
used = 0
available = 0
exhausted = false
non200 = 0
statuses = {}

local headers = { ["Content-Type"] = "application/json" }

function init(args)
  local path = args[1]
  if path == nil then
    return
  end
  local share = tonumber(args[2] or "1")
  local first = tonumber(args[3] or "0")
  local count = tonumber(args[4] or "-1")
  tokens = {}
  local line_no = 0
  for line in io.lines(path) do
    if line ~= "" then
      local k = line_no - first
      if count >= 0 and k >= count then
        break
      end
      -- Round-robin split of the slice: thread t takes its lines t, t + share, ...
      if k >= 0 and k % share == id then
        table.insert(tokens, line)
      end
      line_no = line_no + 1
    end
  end
  available = #tokens
end

-- wrk asks before each request how long the connection waits first: a closed loop with think time. Only
-- defined when asked for: a delay() of 0 still costs wrk a timer event per request.
local pause = tonumber(os.getenv("BENCH_DELAY_MS") or "0")
if pause > 0 then
  function delay()
    return pause
  end
end

function request()
  if tokens == nil then
    return wrk.format()
  end
  if used >= available then
    if not exhausted then
      exhausted = true
      wrk.thread:stop()
    end
    -- The thread is stopping; this request is never measured as a mint. /livez keeps it harmless.
    return wrk.format("GET", "/livez")
  end
  used = used + 1
  local token = tokens[used]
  -- Drop the reference so memory falls as the run goes on; tokens are ~1.5 kB each.
  tokens[used] = nil
  -- Tokens are base64url and dots only, so no JSON escaping is needed.
  return wrk.format("POST", nil, headers, '{"token": "' .. token .. '"}')
end

function response(status, _headers, _body)
  statuses[status] = (statuses[status] or 0) + 1
  if status ~= 200 then
    non200 = non200 + 1
  end
end

function done(_summary, _latency, _requests)
  -- done() runs in the main Lua state, so per-thread counters are fetched from each thread's state.
  local total_non200, total_used, total_available, any_exhausted = 0, 0, 0, false
  local merged = {}
  for _, thread in ipairs(threads) do
    total_non200 = total_non200 + thread:get("non200")
    total_used = total_used + thread:get("used")
    total_available = total_available + thread:get("available")
    any_exhausted = any_exhausted or thread:get("exhausted")
    for status, count in pairs(thread:get("statuses")) do
      merged[status] = (merged[status] or 0) + count
    end
  end
  local parts = {}
  for status, count in pairs(merged) do
    table.insert(parts, string.format('"%d": %d', status, count))
  end
  -- One JSON line with a fixed prefix: bench/load.py finds it in wrk's output.
  io.write(string.format(
    'BENCH-LUA {"non200": %d, "tokens_used": %d, "tokens_available": %d, "exhausted": %s, "statuses": {%s}}\n',
    total_non200, total_used, total_available, tostring(any_exhausted), table.concat(parts, ", ")
  ))
end
