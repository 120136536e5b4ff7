-- Cycles the benchmark keys (KEYS of them; 1 for the static-bearer variant).
local n = tonumber(os.getenv("KEYS") or "1000")
local i = 0
request = function()
  local k = string.format("kb_bench%06dxxxxxxxxxxxxxxxxxxxxx", i % n)
  i = i + 1
  return wrk.format("GET", "/v1/items", { ["Authorization"] = "Bearer " .. k })
end
