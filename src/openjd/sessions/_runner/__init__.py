"""The ``openjd-sessions run`` command, built only on the public API of ``openjd.sessions``.

``plan`` turns a template into a ``JobPlan``. ``coordinator.JobRunner`` runs the plan's
steps on a ``backend``: Sessions on threads of this process (``backend_local``) or on the
workers of a Dask cluster (``backend_dask``). Backends report ``events``, ``output``
writes them, and ``cli`` ties these together.
"""
