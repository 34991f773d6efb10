"""Train-state checkpoints with Orbax's CheckpointManager.

Each saved step holds two items: ``state`` (the train state pytree: step, float32 params,
optimizer state, RNG key data; saved sharded, restored straight into the given shardings) and
``meta`` (JSON: the data position = the next step's index into the batch order, the data seed,
the model config, and anything the caller adds).

    ckpt = TrainCheckpointer("OUT/checkpoints", save_every=100, keep=3)
    step = ckpt.latest_step()                          # None: start fresh
    meta = ckpt.meta(step)                             # resume: the saved settings first,
    state = ckpt.restore(abstract_state, shardings, step)   # then the state
    ckpt.maybe_save(step, state, {"data_step": step})  # every save_every steps
    ckpt.save(step, state, meta, force=True); ckpt.close()
"""

from __future__ import annotations

from pathlib import Path

import jax


class TrainCheckpointer:
    """Saves / restores train states under ``directory`` every ``save_every`` steps, keeping the
    last ``keep``.

    Args:
      directory: the checkpoint root (created; one sub-directory per step).
      save_every: save when ``step % save_every == 0`` (``maybe_save``).
      keep: checkpoints kept (older ones are deleted); None keeps all.
      async_save: let Orbax write in the background (``wait`` / ``close`` to finish).
    """

    def __init__(self, directory: str | Path, save_every: int = 100, keep: int | None = 3,
                 async_save: bool = False):
        import orbax.checkpoint as ocp

        self.directory = Path(directory).absolute()
        self.save_every = int(save_every)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(self.save_every, 1),
            enable_async_checkpointing=async_save, create=True)
        self._mgr = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mgr.all_steps())

    def save(self, step: int, state, meta: dict | None = None, force: bool = False) -> bool:
        """Save ``state`` (and JSON-able ``meta``) as ``step``; returns whether it saved
        (``force`` saves off the ``save_every`` grid, e.g. at the end)."""
        import orbax.checkpoint as ocp

        return self._mgr.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta or {}))),
            force=force)

    def maybe_save(self, step: int, state, meta: dict | None = None) -> bool:
        """Save when ``step`` is a multiple of ``save_every``."""
        if self.save_every <= 0 or step % self.save_every:
            return False
        return self.save(step, state, meta)

    def restore(self, abstract_state, shardings=None, step: int | None = None):
        """The train state saved as ``step`` (default: the latest); its ``meta`` is read apart,
        with :meth:`meta`.

        Args:
          abstract_state: the state's structure with ``jax.ShapeDtypeStruct`` (or array) leaves.
          shardings: a matching tree of shardings to restore into (None: default device).
        Returns:
          the state, a tree of ``abstract_state``'s structure with its shapes and dtypes, its
          arrays on ``shardings``.
        Raises:
          FileNotFoundError: no checkpoint in the directory.
        """
        import orbax.checkpoint as ocp

        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        if shardings is None:
            dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree_util.tree_map(lambda _: dev, abstract_state)
        target = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
            shardings)
        out = self._mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))
        return out["state"]

    def meta(self, step: int) -> dict:
        """The JSON ``meta`` saved with ``step`` alone (no state restored)."""
        import orbax.checkpoint as ocp

        try:
            out = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except (KeyError, ValueError, OSError) as e:  # a directory of that name, no checkpoint
            raise ValueError(f"{self.directory / str(step)}: not a train checkpoint (no readable "
                             f"meta: {type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                             "move it out of the checkpoints directory") from None
        return dict(out["meta"] or {})

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()
