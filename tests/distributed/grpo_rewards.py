"""A reward for the distributed GRPO tests (importable as tests.distributed.grpo_rewards:reward by every rank)."""


def reward(prompt, completion, answer=None, **fields):
    """Varies with the completion, so the groups have advantages to follow."""
    return float(sum(map(ord, completion)) % 5)
