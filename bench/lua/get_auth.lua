-- GET the URL given to wrk with the API key in $BALLAST_BENCH_KEY; prints the summary as JSON.
local report = require("report")
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BALLAST_BENCH_KEY")
done = report.done
