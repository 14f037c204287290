-- POST batches of utterances with ids unique across threads and runs.
-- Arguments (after --): sessions_prefix, sessions, per_request, run_tag
-- Requests go round-robin over sessions <prefix>0 .. <prefix>(sessions-1).
local report = require("report")
done = report.done

local next_thread = 0
function setup(thread)
   thread:set("tid", next_thread)
   next_thread = next_thread + 1
end

local prefix, sessions, per_request, tag
local counter = 0
local text = "and then we looked at the numbers again and they still did not add up"

function init(args)
   prefix = args[1] or "bench-"
   sessions = tonumber(args[2] or "64")
   per_request = tonumber(args[3] or "1")
   tag = (args[4] or "r") .. "-" .. tostring(tid)
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
end

function request()
   counter = counter + 1
   local sid = prefix .. tostring(counter % sessions)
   local parts = {}
   for i = 1, per_request do
      local n = (counter - 1) * per_request + i
      -- Times wrap within a week (the model refuses start_ms past 604,800,000 with a
      -- 422): unwrapped, a run past 6,048 requests of 100 (easily reached when
      -- refusals come back at once) turned every later request into a 422.
      local start = (n % 600000) * 1000
      parts[i] = string.format(
         '{"id":"%s-%d","type":"utterance","speaker":"spk_%d","start_ms":%d,"end_ms":%d,"text":"%s"}',
         tag, n, n % 4, start, start + 900, text)
   end
   local body = '{"mutations":[' .. table.concat(parts, ",") .. ']}'
   return wrk.format(nil, "/v1/sessions/" .. sid .. "/mutations", nil, body)
end
