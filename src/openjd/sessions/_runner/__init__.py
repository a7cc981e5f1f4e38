"""The ``openjd-sessions run`` command, built only on the public API of ``openjd.sessions``.

``plan`` turns a template into a ``JobPlan``, a ``backend`` runs the plan and reports
``events``, ``output`` writes them, and ``cli`` ties these together.
"""
