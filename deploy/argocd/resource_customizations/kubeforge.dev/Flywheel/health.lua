-- Argo CD health of a kubeforge Flywheel, from its Ready and Cycling conditions and its stage.
-- Ready False (a reference that does not resolve, an invalid spec) is Degraded. A cycle in
-- progress (Cycling True, or a stage other than Idle) is Progressing, the message naming the
-- cycle and the stage. Between cycles a suspended Flywheel is Suspended, and Ready True is
-- Healthy with the last cycle's outcome as the message: a last candidate rolled back, rejected
-- by the gate or failed is still Healthy (the loop works, the stable model serves), and the
-- message says the candidate was not promoted.
local hs = {}

local function condition(conds, t)
  if conds == nil then return nil end
  for _, c in ipairs(conds) do
    if c.type == t then return c end
  end
  return nil
end

local function text(v, default)
  if v == nil or v == "" then return default end
  return tostring(v)
end

local function not_promoted(outcome)
  return outcome == "RolledBack" or outcome == "Rejected" or outcome == "Failed"
end

local function last_cycle(status)
  if status.cycles == nil or #status.cycles == 0 then return nil end
  return status.cycles[#status.cycles]
end

local function outcome_message(c, stable)
  local m = "cycle " .. text(c.cycle, "?") .. ": " .. text(c.outcome, "no outcome")
  if not_promoted(c.outcome) then m = m .. ", the candidate was not promoted" end
  if c.reason ~= nil and c.reason ~= "" then m = m .. " (" .. c.reason .. ")" end
  if stable ~= nil and stable ~= "" then m = m .. "; serving " .. stable end
  return m
end

local status = obj.status
if status == nil or status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe the Flywheel"
  return hs
end
if obj.metadata.generation ~= nil and status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. obj.metadata.generation
  return hs
end
local ready = condition(status.conditions, "Ready")
if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
  return hs
end
local suspend = obj.spec ~= nil and obj.spec.suspend == true
if ready.status == "False" and not (suspend and ready.reason == "Suspended") then
  hs.status = "Degraded"
  hs.message = text(ready.reason, "NotReady") .. ": " .. text(ready.message, "")
  return hs
end
local cycling = condition(status.conditions, "Cycling")
local idle = status.stage == nil or status.stage == "Idle"
if not idle or (cycling ~= nil and cycling.status == "True") then
  hs.status = "Progressing"
  hs.message = "cycle " .. text(status.cycle, "?")
  if not idle then hs.message = hs.message .. ": " .. status.stage end
  if cycling ~= nil and cycling.message ~= nil and cycling.message ~= "" then
    hs.message = hs.message .. "; " .. cycling.message
  end
  if suspend then hs.message = hs.message .. " (spec.suspend is true)" end
  return hs
end
local last = last_cycle(status)
if suspend then
  hs.status = "Suspended"
  hs.message = "spec.suspend is true: no cycle starts"
  if last ~= nil then hs.message = hs.message .. "; last " .. outcome_message(last, status.stableTrainingJob) end
  return hs
end
if ready.status == "True" then
  hs.status = "Healthy"
  if last ~= nil then
    hs.message = outcome_message(last, status.stableTrainingJob)
  else
    hs.message = text(ready.message, "no cycle yet")
  end
  return hs
end
hs.status = "Progressing"
hs.message = text(ready.reason, "Unknown") .. ": " .. text(ready.message, "")
return hs
