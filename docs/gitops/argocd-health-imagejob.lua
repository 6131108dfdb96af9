-- Argo CD health check for zimage.dev/v1alpha1 ImageJob and ImageWorkflow (docs/gitops.md): the same phases.
-- Succeeded: Healthy. Failed, Cancelled: Degraded (neither produced the images; neither ever resumes).
-- No status yet, Pending, Queued, Running: Progressing, with the operator's message and progress (a job's
-- steps, a workflow's steps done out of all).
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

local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  local what = "job"
  if obj.kind == "ImageWorkflow" then
    what = "workflow"
  end
  hs.message = "Waiting for the zimage operator to admit the " .. what
  return hs
end

local phase = status.phase
local message = status.message
if message == nil or message == "" then
  message = phase
end

if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = message
  return hs
end

if phase == "Failed" or phase == "Cancelled" then
  -- The condition named after the phase carries the reason (InvalidSpec, Timeout, WorkerError, StepFailed, ...).
  local c = condition(status, phase)
  local label = phase
  if c ~= nil and c.reason ~= nil and c.reason ~= phase then
    label = phase .. " (" .. c.reason .. ")"
  end
  hs.status = "Degraded"
  hs.message = label .. ": " .. message
  return hs
end

-- Pending, Queued, Running, or a phase this script does not know yet.
local label = phase
local progress = status.progress
if phase == "Running" and progress ~= nil and progress.summary ~= nil and progress.summary ~= "" then
  label = phase .. " " .. progress.summary
end
hs.status = "Progressing"
hs.message = label .. ": " .. message
local generation = obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration ~= generation then
  hs.message = hs.message .. " (status is for generation " .. tostring(status.observedGeneration)
    .. ", the spec is at " .. tostring(generation) .. ")"
end
return hs
