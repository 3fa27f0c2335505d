"""Policy models behind one interface (habc_policy.models.base.Policy)."""
