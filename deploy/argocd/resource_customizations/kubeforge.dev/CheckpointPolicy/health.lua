-- Argo CD health of a kubeforge CheckpointPolicy: Healthy while its storage is reachable,
-- Degraded when the operator says it is not (missing Secret or claim, unreachable bucket,
-- invalid spec), Progressing until the operator has observed the current generation.
local hs = {}

local function condition(conds, t)
  if conds == nil then return nil end
  for _, c in ipairs(conds) do
    if c.type == t then return c end
  end
  return nil
end

local status = obj.status
if status == nil or status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to check the storage"
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
if ready.status == "True" then
  hs.status = "Healthy"
else
  hs.status = "Degraded"
end
hs.message = ready.message or ready.reason or ""
if ready.reason ~= nil and ready.status ~= "True" then
  hs.message = ready.reason .. ": " .. hs.message
end
return hs
