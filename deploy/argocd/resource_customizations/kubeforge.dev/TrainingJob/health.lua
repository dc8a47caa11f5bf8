-- Argo CD health of a kubeforge TrainingJob, from its conditions (kstatus style).
-- Suspended (spec.suspend) is Suspended; Failed is Degraded; Succeeded is Healthy; a
-- generation the operator has not observed yet, or workers starting/restarting, is Progressing.
local hs = {}

local function condition(conds, t)
  if conds == nil then return nil end
  for _, c in ipairs(conds) do
    if c.type == t then return c end
  end
  return nil
end

local function message(c, default)
  if c ~= nil and c.message ~= nil and c.message ~= "" then return c.message end
  return default
end

local status = obj.status
if status == nil or status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe the TrainingJob"
  return hs
end
if obj.metadata.generation ~= nil and status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. obj.metadata.generation
  return hs
end

local conds = status.conditions
local failed = condition(conds, "Failed")
if failed ~= nil and failed.status == "True" then
  hs.status = "Degraded"
  hs.message = message(failed, "TrainingJob failed")
  return hs
end
local succeeded = condition(conds, "Succeeded")
if succeeded ~= nil and succeeded.status == "True" then
  hs.status = "Healthy"
  hs.message = message(succeeded, "TrainingJob succeeded")
  return hs
end
local suspended = condition(conds, "Suspended")
if suspended ~= nil and suspended.status == "True" then
  hs.status = "Suspended"
  hs.message = message(suspended, "TrainingJob is suspended")
  return hs
end
local ready = condition(conds, "Ready")
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = message(ready, "Workers are running")
  return hs
end
if ready ~= nil and (ready.reason == "InvalidSpec" or ready.reason == "CheckpointPolicyNotFound") then
  hs.status = "Degraded"
  hs.message = message(ready, ready.reason)
  return hs
end
local restarting = condition(conds, "Restarting")
if restarting ~= nil and restarting.status == "True" then
  hs.status = "Progressing"
  hs.message = "Restarting: " .. message(restarting, restarting.reason or "workers are being replaced")
  return hs
end
hs.status = "Progressing"
hs.message = message(ready, "Waiting for workers")
return hs
