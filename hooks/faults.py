"""Faults the hook detects, and how every rank comes to raise the same error for them.

* :class:`CorruptPayloadError`: a payload failed its checksum or its format checks.  It names the
  rank that sent the payload.  The hook makes every rank raise it, with the same message:

  - bytes every rank receives alike (allgather payloads, the compressed shard means of
    scatter-reduce) are decoded in rank order on every rank, so every rank fails on the same
    payload with the same message, without talking about it;
  - a shard payload of scatter-reduce reaches only its owner: the owner sends the error's text in
    place of its compressed mean, flagged in the size header that precedes the means, so the
    report rides on an exchange the hook makes anyway (no extra round trip).

* Every failure, of any type, reaches the training script typed: the hook raises it on the
  autograd thread from the last bucket's hook call (see :func:`raise_pending`), which DDP
  propagates unchanged out of ``loss.backward()``.  An exception set on the bucket's future would
  not survive: DDP casts the future's value to a tensor, and the user would see
  ``RuntimeError: Unable to cast ... to Tensor``.
"""

from __future__ import annotations

from threelc.format import FormatError

__all__ = ["CorruptPayloadError", "decode_checked", "raise_pending", "NO_REPORT"]

#: The value of the "report" column of the means' size header when a shard owner found nothing wrong.
NO_REPORT = -1


class CorruptPayloadError(FormatError):
    """A rank sent a payload that fails its checksum or format checks; every rank raises this.

    Attributes
    ----------
    bucket : int
        DDP's bucket index.
    sender : int
        Rank (in the hook's process group) that sent the corrupt payload.
    receiver : int or None
        The rank that detected it, when only that rank received it (a scatter-reduce shard).
    """

    def __init__(self, message: str, *, bucket: int, sender: int, receiver: int | None = None):
        super().__init__(message)
        self.bucket, self.sender, self.receiver = bucket, sender, receiver

    def __reduce__(self):  # picklable with its attributes (spawned test processes return it)
        return _rebuild, (str(self), self.bucket, self.sender, self.receiver)


def _rebuild(message, bucket, sender, receiver):
    return CorruptPayloadError(message, bucket=bucket, sender=sender, receiver=receiver)


def corrupt_message(bucket: int, sender: int, error: FormatError, receiver: int | None = None) -> str:
    where = f"the payload rank {sender} sent" if receiver is None else \
        f"the shard payload rank {sender} sent to rank {receiver}"
    return f"threelc: bucket {bucket}: {where} is corrupt: {error}"


def decode_checked(decode, payload, out, *, bucket: int, sender: int, receiver: int | None = None) -> None:
    """``decode(payload, out)``, with a :class:`~threelc.FormatError` turned into a
    :class:`CorruptPayloadError` that names the sender."""
    try:
        decode(payload, out)
    except CorruptPayloadError:
        raise
    except FormatError as error:
        raise CorruptPayloadError(corrupt_message(bucket, sender, error, receiver), bucket=bucket, sender=sender,
                                  receiver=receiver) from error


def raise_pending(state) -> None:
    """Raise the first failure of the state's bucket jobs, if any, with its own type.

    Called by the hook on the autograd thread.  The failure stays recorded: every later call
    raises it again until :meth:`~threelc.hooks.ThreeLCState.load_state_dict` resets the state (a
    DDP model whose backward failed cannot run another step anyway).
    """
    failure = state._failure
    if failure is not None:
        raise failure
