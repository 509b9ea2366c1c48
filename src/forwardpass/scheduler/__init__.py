"""Request scheduling: dynamic batching (pure plan + event-loop executor) and the response cache."""

from forwardpass.scheduler.batcher import Decision, Pending, Policy, plan
from forwardpass.scheduler.cache import ResponseCache, cache_key
from forwardpass.scheduler.dynamic import DynamicBatcher

__all__ = ["Decision", "DynamicBatcher", "Pending", "Policy", "ResponseCache", "cache_key", "plan"]
