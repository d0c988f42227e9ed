-- Argo CD health check for finetune.dev/FineTuneJob (finetune-operator).
-- Runs with Argo CD's libraries only (base, table): no string functions.
local hs = {}

local function condition(type)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == type and c.status == "True" then
      return c
    end
  end
  return nil
end

local function explain(c)
  if c.message ~= nil and c.message ~= "" then
    return c.reason .. ": " .. c.message
  end
  return c.reason
end

if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the operator to take the job up"
  return hs
end

if obj.status.observedGeneration ~= nil and obj.metadata.generation ~= nil
    and obj.status.observedGeneration ~= obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "the operator has not acted on generation " .. obj.metadata.generation .. " yet"
  return hs
end

local failed = condition("Failed")
if failed ~= nil then
  hs.status = "Degraded"
  hs.message = explain(failed)
  return hs
end

local complete = condition("Complete")
if complete ~= nil then
  hs.status = "Healthy"
  hs.message = explain(complete)
  return hs
end

local suspended = condition("Suspended")
local stalled = condition("Stalled")
if suspended ~= nil and suspended.reason ~= "Queued" and (stalled == nil or stalled.reason == "NoProgress") then
  hs.status = "Suspended"
  hs.message = obj.status.message or suspended.message
  return hs
end

if stalled ~= nil then
  hs.status = "Degraded"
  hs.message = explain(stalled)
  return hs
end

hs.status = "Progressing"
hs.message = obj.status.message or "waiting for the trainer"
return hs
