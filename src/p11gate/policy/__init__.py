"""Policy: who may see which virtual tokens and do what there.

``config`` holds the ``[[rule]]`` tables, ``rules`` turns an identity into per-token
grants, ``namespace`` confines a tenant to part of a shared token.
"""

from .rules import ALL_PERMISSIONS, Denied, Grant, Namespace, Policy, require

__all__ = ["ALL_PERMISSIONS", "Denied", "Grant", "Namespace", "Policy", "require"]
