-- Argo CD health of a kubeforge Dataset, from its Ready and Curating conditions.
-- A committed version is Healthy (Ready True), unless curation fails or cannot work as
-- specified: a failed curation, volume storage, an unusable Secret, an unreachable store or
-- an invalid spec is Degraded (with a version too: new data no longer becomes training data).
-- No version yet (curating, source empty, waiting for the InferenceService or policy) is
-- Progressing; suspended without a version is Suspended.
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
  CurationFailed = true,
  StoreUnsupported = true,
  StoreUnreachable = true,
  CaptureNotConfigured = true,
  InferenceServiceInvalid = true,
  CheckpointPolicyInvalid = true,
  SecretNotFound = true,
  SecretMissingKeys = true,
  SecretForbidden = true,
}

local status = obj.status
if status == nil or status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe the Dataset"
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
local curating = condition(status.conditions, "Curating")
for _, c in ipairs({ready, curating}) do
  if c ~= nil and c.status ~= "True" and degraded[c.reason] then
    hs.status = "Degraded"
    hs.message = c.reason .. ": " .. (c.message or "")
    return hs
  end
end
hs.message = ready.message or ""
if ready.status == "True" then
  hs.status = "Healthy"
elseif ready.reason == "Suspended" then
  hs.status = "Suspended"
else
  hs.status = "Progressing"
  hs.message = ready.reason .. ": " .. hs.message
end
return hs
