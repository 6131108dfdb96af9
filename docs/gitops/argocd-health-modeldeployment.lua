-- Argo CD health check for zimage.dev/v1alpha1 ModelDeployment (docs/gitops.md).
-- Degraded=True: Degraded. ModelCached=False: Progressing (the preload Job is still downloading).
-- Available=True: Healthy, including an idle pool scaled to zero (reason ScaledToZero) and a pool that is
-- scaling while some workers serve. Anything else, or a status older than the spec: Progressing.
local hs = {}

local function condition(status, kind)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function describe(c)
  if c.message ~= nil and c.message ~= "" then
    return c.reason .. ": " .. c.message
  end
  return c.reason
end

local status = obj.status
if status == nil or status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the zimage operator to reconcile the pool"
  return hs
end

local generation = obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the zimage operator to observe generation " .. tostring(generation)
  return hs
end

local degraded = condition(status, "Degraded")
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(degraded)
  return hs
end

local cached = condition(status, "ModelCached")
if cached ~= nil and cached.status == "False" then
  hs.status = "Progressing"
  hs.message = describe(cached)
  return hs
end

local available = condition(status, "Available")
if available ~= nil and available.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(available)
  local scaling = condition(status, "Scaling")
  if scaling ~= nil and scaling.status == "True" then
    hs.message = hs.message .. "; scaling (" .. describe(scaling) .. ")"
  end
  return hs
end

hs.status = "Progressing"
if available ~= nil then
  hs.message = describe(available)
else
  hs.message = "Waiting for the Available condition"
end
return hs
