"""Everything that touches the world: calling nodes, sleeping, stores, hooks, the log.

The interpreters hold no policy: they perform the effects the pure machine
(``stroma.machine``) emits and feed back what happened.
"""

__all__: tuple[str, ...] = ()

# The facade (``stroma``) imports the interpreters; importing it first lets an
# interpreters module be the first thing a program imports (``from interpreters.simulate
# import simulate``) without meeting a half-initialized module.
import stroma  # noqa: F401
