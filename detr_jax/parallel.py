"""How arrays lie over this host's devices: one data-parallel axis, ``AXIS``, for the pmap'd train
step and the sharded evaluation alike."""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "batch"


def local_mesh() -> Mesh:
    """A 1-D mesh over this host's devices, axis ``AXIS``."""
    return Mesh(np.asarray(jax.local_devices()), (AXIS,))


def shard(batch, num_devices: int):
    """Host batch [B, ...] -> [devices, B / devices, ...]."""
    return jax.tree.map(lambda x: x.reshape(num_devices, -1, *x.shape[1:]), batch)


def replicate(tree, num_devices: int):
    """Host pytree -> [devices, ...] copies, for pmap."""
    return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (num_devices, *np.shape(x))), tree)


def replicate_on_devices(tree, num_devices: int):
    """Host pytree -> copies on the local devices, laid out as ``jax.pmap`` lays out its outputs: a
    pmap'd step then sees the same input layout at its first call as at every later one and builds
    one program, not two (host arrays at the first call would cost a second compilation). The
    step's outputs are sharded over a mesh of the local devices whose axis is pmap's ``AXIS``."""
    mesh = Mesh(np.asarray(jax.local_devices()[:num_devices]), (AXIS,))
    return jax.device_put(replicate(tree, num_devices), NamedSharding(mesh, PartitionSpec(AXIS)))


def first_local(tree):
    """A pmap output (leaves [local devices, ...]) -> the host copy of its first local device's
    entry. Local only: on several hosts indexing the global array would be a computation of its
    own, which every host would have to run in the same order."""
    def first(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x[0])
        shard = np.asarray(x.addressable_data(0))  # pmap's shards drop the device axis, a mesh's keep it
        return np.asarray(shard[0]) if shard.ndim == x.ndim else shard

    return jax.tree.map(first, tree)
