-- Argo CD health check for finetune.dev/FineTuneJob (finetune-operator).
-- Runs with Argo CD's libraries only (base, table): no string functions.
local function verdict(status, message)
  return {status = status, message = message}
end

local function condition(type)
  for _, c in ipairs(obj.status.conditions or {}) do
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
  return verdict("Progressing", "waiting for the operator to take the job up")
end
local observed, generation = obj.status.observedGeneration, obj.metadata.generation
if observed ~= nil and generation ~= nil and observed ~= generation then
  return verdict("Progressing", "the operator has not acted on generation " .. generation .. " yet")
end

local failed = condition("Failed")
if failed ~= nil then
  return verdict("Degraded", explain(failed))
end
local complete = condition("Complete")
if complete ~= nil then
  return verdict("Healthy", explain(complete))
end
-- A user's pause ends a missing-heartbeat stall; a queue's hold (Queued) is progress.
local suspended, stalled = condition("Suspended"), condition("Stalled")
if suspended ~= nil and suspended.reason ~= "Queued" and (stalled == nil or stalled.reason == "NoProgress") then
  return verdict("Suspended", obj.status.message or suspended.message)
end
if stalled ~= nil then
  return verdict("Degraded", explain(stalled))
end
return verdict("Progressing", obj.status.message or "waiting for the trainer")
