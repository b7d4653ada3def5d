-- sysbench script: one 1,000-row (~130 KB) result per event, read and decoded by libmariadb.
-- Used by benchmarks/run.py for the 1,000-row figure under concurrency (several threads).
function thread_init()
  drv = sysbench.sql.driver()
  con = drv:connect()
end

function thread_done()
  con:disconnect()
end

function event()
  con:query("SELECT seq, REPEAT('r', 120) FROM seq_1_to_1000")
end
