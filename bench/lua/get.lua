-- GET the URL given to wrk, as is; prints the summary as JSON.
local report = require("report")
done = report.done
