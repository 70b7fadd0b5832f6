"""Everything that touches the world: calling nodes, sleeping, stores, hooks, the log.

The interpreters hold no policy: they perform the effects the pure machine
(``stroma.machine``) emits and feed back what happened.
"""

__all__: tuple[str, ...] = ()
