-- Argo CD health of a kubeforge InferenceService, from its Ready condition.
-- Serving is Healthy; scaled to zero is Suspended; a model that cannot be served as
-- specified (invalid spec, no export store, volume storage, unreachable store) is Degraded;
-- waiting for an export, for replicas or for a rollout is Progressing.
local hs = {}

local function condition(conds, t)
  if conds == nil then return nil end
  for _, c in ipairs(conds) do
    if c.type == t then return c end
  end
  return nil
end

local degraded = {
  InvalidSpec = true,
  NoExportStore = true,
  UnsupportedStorage = true,
  StoreUnreachable = true,
}

local status = obj.status
if status == nil or status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe the InferenceService"
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
hs.message = ready.message or ""
if ready.status == "True" then
  hs.status = "Healthy"
elseif ready.reason == "ScaledToZero" then
  hs.status = "Suspended"
elseif degraded[ready.reason] then
  hs.status = "Degraded"
  hs.message = ready.reason .. ": " .. hs.message
else
  hs.status = "Progressing"
end
return hs
