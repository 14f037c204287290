-- Shared by the scripts here: print wrk's summary as one JSON line (latencies in ms).
local M = {}

function M.done(summary, latency, requests)
   local e = summary.errors
   local errors = e.connect + e.read + e.write + e.status + e.timeout
   local secs = summary.duration / 1e6
   io.write(string.format(
      '{"requests": %d, "duration_s": %.3f, "rps": %.1f, "errors": %d, "non_2xx": %d, ' ..
      '"timeouts": %d, "p50_ms": %.3f, "p90_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f, ' ..
      '"mean_ms": %.3f}\n',
      summary.requests, secs, summary.requests / secs, errors, e.status, e.timeout,
      latency:percentile(50) / 1000, latency:percentile(90) / 1000,
      latency:percentile(99) / 1000, latency.max / 1000, latency.mean / 1000))
end

return M
