"""Pools: one virtual token served by several equivalent members (HSM partitions,
replicated HSMs, SoftHSM tokens), with load balancing, failover, session pooling and
object identity across members. A pool is a :class:`~p11gate.backends.base.Backend`,
so the frontend serves it like any other back end."""
