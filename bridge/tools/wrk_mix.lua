-- The callback mix of `bridge bench --driver wrk`, the same as the Python generator's (bridge/tools/loadgen.py).
--
-- wrk -t1 -c64 -d5s -s wrk_mix.lua http://127.0.0.1:PORT -- MIX_FILE KEY_SALT SEQ_BASE ACCOUNTS
--
-- MIX_FILE, written by bridge/tools/wrk.py: lines "T<tab>PATH<tab>BODY" (one per command and padding, the
-- bodies with placeholders for the key, the group sequence number and the account), then one line
-- "O<tab>I I I ..." giving the order of the templates in the mix (their shares and their shuffle).
-- KEY_SALT is new for every wrk run (the bench's pid and the time in ms, plus the run's counter), so every
-- MsgKey is new in every run: a repeated key would be answered from the bridge's dedup window without
-- touching Kafka. SEQ_BASE (the time in microseconds) makes a group message's MsgSeq new the same way.
-- Keys look like Tencent's (71_1_1698741698): no digit run of 19 or more.

local templates, order, accounts = {}, {}, {}
local key_salt, seq_base = "", 0
local count = 0
local placeholders = { "__bench_account__", "__bench_key__", '"__bench_seq__"' }

local function split_tabs(line)
  local fields = {}
  for field in (line .. "\t"):gmatch("([^\t]*)\t") do
    fields[#fields + 1] = field
  end
  return fields
end

-- A body template cut once into its text and its placeholders: `parts` holds the text, with a number (the
-- placeholder's index) where a value goes, so a request is one table.concat, not three scans of the body.
local function cut(body)
  local parts, at = {}, 1
  while true do
    local first, last, which
    for index, placeholder in ipairs(placeholders) do
      local from, to = body:find(placeholder, at, true)
      if from and (not first or from < first) then
        first, last, which = from, to, index
      end
    end
    if not first then
      parts[#parts + 1] = body:sub(at)
      return parts
    end
    parts[#parts + 1] = body:sub(at, first - 1)
    parts[#parts + 1] = which
    at = last + 1
  end
end

function init(args)
  local mix_file, account_count = args[1], tonumber(args[4])
  key_salt, seq_base = args[2], tonumber(args[3])
  local host = wrk.headers["Host"] or wrk.host
  for line in io.lines(mix_file) do
    local fields = split_tabs(line)
    if fields[1] == "T" then
      local head = "POST " .. fields[2] .. " HTTP/1.1\r\nHost: " .. host
        .. "\r\nContent-Type: application/json\r\nContent-Length: "
      templates[#templates + 1] = { head = head, parts = cut(fields[3]) }
    elseif fields[1] == "O" then
      for index in fields[2]:gmatch("%d+") do
        order[#order + 1] = templates[tonumber(index) + 1]
      end
    end
  end
  for number = 0, account_count - 1 do
    accounts[number + 1] = "bench_account_" .. number
  end
end

local values, pieces = {}, {}

function request()
  local n = count
  count = count + 1
  local template = order[n % #order + 1]
  -- A multiplicative hash spreads accounts over commands and sizes instead of tying them together.
  values[1] = accounts[math.floor((n * 2654435761) % 4294967296 / 128) % #accounts + 1]
  values[2] = key_salt .. "_" .. n
  values[3] = string.format("%.0f", seq_base + n)
  local parts = template.parts
  for index = 1, #parts do
    local part = parts[index]
    pieces[index] = type(part) == "number" and values[part] or part
  end
  local body = table.concat(pieces, "", 1, #parts)
  return template.head .. #body .. "\r\n\r\n" .. body
end

-- The bench reads these lines: totals, then every distinct latency in microseconds with its count.
function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    "bench-summary requests=%d duration_us=%d connect=%d read=%d write=%d status=%d timeout=%d\n",
    summary.requests, summary.duration, errors.connect, errors.read, errors.write, errors.status,
    errors.timeout
  ))
  for index = 1, #latency do
    local value, number = latency(index)
    io.write(string.format("bench-latency %d %d\n", value, number))
  end
end
