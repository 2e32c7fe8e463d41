"""Input statistics the methods share: Gram matrices X^T X of a linear's inputs, summed in fp32.

GPTQ's Hessian is 2/n X^T X; AWQ scores a lone linear's candidate weights from X^T X. Both are large
matrix products (Llama-3-8B's down_proj input is 14336 wide), so where the activations are already
bf16/fp16 on CUDA they are multiplied on the tensor cores with fp32 sums. What that costs in accuracy
is measured in tests/test_gpu.py.
"""

from __future__ import annotations

import torch

GRAM_PRODUCTS = ("auto", "fp32")
GRAM_ROWS = 2048


def half_precision_products(x: torch.Tensor, products: str = "auto") -> bool:
    """Whether ``x``'s products may run on the tensor cores: ``auto``, CUDA and bf16/fp16 values."""
    return products == "auto" and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def add_gram(total: torch.Tensor, x: torch.Tensor, products: str = "auto") -> None:
    """total += x^T x for x [tokens, features], accumulated in fp32; on the tensor-core path only the
    upper triangle of row blocks is added (``complete_gram`` fills in the rest once all are added).

    ``auto``: when x is bf16/fp16 on CUDA, multiply in its own dtype on the tensor cores with fp32
    output. The inputs lose nothing (they are already bf16/fp16 and their products are exact in
    fp32); the sums are fp32, in cuBLAS's order. Measured on an H100 against float64 (16384 tokens x
    512 channels, tests/test_gpu.py): relative error 2.8e-5, against 1.8e-6 with fp32 products;
    cuBLAS's reduction order for bf16 GEMMs is coarser. Both are far below the 1% damping GPTQ adds
    to H. x^T x is symmetric, so each block of GRAM_ROWS rows is multiplied only from its diagonal
    block rightwards (for a 14336-wide input 57% of the products). fp32 inputs, the CPU and ``fp32``
    use whole fp32 products."""
    if half_precision_products(x, products):
        for rows in range(0, x.shape[1], GRAM_ROWS):  # a [GRAM_ROWS, features] fp32 temporary at most
            block = x[:, rows : rows + GRAM_ROWS]
            total[rows : rows + GRAM_ROWS, rows:] += torch.mm(block.t(), x[:, rows:], out_dtype=torch.float32)
    else:
        x = x.float()
        total.addmm_(x.t(), x)


def complete_gram(total: torch.Tensor) -> torch.Tensor:
    """The whole Gram matrix from what ``add_gram`` added: the blocks below the diagonal copied from
    their mirror images above it (a no-op where whole products were added). In place; returns total."""
    for rows in range(GRAM_ROWS, total.shape[0], GRAM_ROWS):
        total[rows : rows + GRAM_ROWS, :rows] = total[:rows, rows : rows + GRAM_ROWS].t()
    return total


def split_bf16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x ~= high + low with both parts in bf16: ~16 significant bits instead of bf16's 8."""
    high = x.bfloat16()
    return high, (x - high.float()).bfloat16()


def quadratic_form_sum(
    error: torch.Tensor, gram: torch.Tensor, gram_parts: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """sum_i e_i^T G e_i over the rows e_i of ``error`` [rows, n], for a symmetric G [n, n]: the summed
    squared output error of a linear whose weights are off by ``error``, over the inputs G = X^T X.

    With ``gram_parts`` (``split_bf16(G)``, on CUDA) E G runs on the tensor cores as two bf16 products
    with fp32 sums, E rounded to bf16 (Llama-3-8B's down_proj on an H100: 2 x 2.1 ms instead of 33.5 ms
    in fp32). G needs both parts: its diagonal is dominated by a few outlier channels, and rounding
    those to bf16 alone moved AWQ's losses by 6.5e-4 in tests/test_gpu.py (both parts: 2.5e-5). E's
    rounding errors are independent across its rows x n entries and cancel in the sum."""
    if gram_parts is not None:
        low_error = error.bfloat16()
        high, low = gram_parts
        product = torch.mm(low_error, high, out_dtype=torch.float32)
        product += torch.mm(low_error, low, out_dtype=torch.float32)
    else:
        product = error @ gram
    return (product * error).sum()


# -- data-parallel ranks ------------------------------------------------------------------------------------------
# Every calibration statistic is a sum (Gram matrices, token counts, channel sums, search losses) or a maximum
# (activation ranges) over tokens. With ``torch.distributed`` initialized (torchrun), each rank sees its share of
# the calibration windows and these functions combine the shares, so that every rank holds the statistic of all
# windows; in a single process they return their input untouched.


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialized process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def distributed() -> bool:
    return world()[1] > 1


def _all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """In place; gloo reduces host tensors (a CUDA tensor visits the host), NCCL device tensors."""
    import torch.distributed as dist

    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    backend = dist.get_backend()
    if tensor.is_cuda and backend == "gloo":
        moved = tensor.cpu()
    elif not tensor.is_cuda and backend == "nccl":
        moved = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    else:
        dist.all_reduce(tensor, reduce_op)
        return tensor
    dist.all_reduce(moved, reduce_op)
    return tensor.copy_(moved)


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of ``tensor`` (in place)."""
    return _all_reduce(tensor, "sum") if distributed() else tensor


def all_max(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum over ranks of ``tensor`` (in place)."""
    return _all_reduce(tensor, "max") if distributed() else tensor


def all_sum_int(value: int, device: torch.device | None = None) -> int:
    """A count summed over ranks (tokens seen)."""
    if not distributed():
        return value
    return int(all_sum(torch.tensor([value], dtype=torch.float64, device=device)).item())


def reduce_named(
    values: dict[str, torch.Tensor], names, op: str, empty, device: torch.device | None = None
) -> dict[str, torch.Tensor]:
    """``values`` (name -> tensor, a name missing where this rank's tokens never reached it: an expert) combined
    over ranks by ``op`` ("sum" or "max"), name by name in the order of ``names``, which every rank lists alike.
    ``empty(name)`` is the neutral tensor of a name this rank lacks (zeros: sums of counts and |x| maxima are
    never negative). A name no rank saw stays missing."""
    if not distributed():
        return values
    names = list(names)
    seen = torch.tensor([name in values for name in names], dtype=torch.float32, device=device)
    all_max(seen)
    out = {}
    for name, anywhere in zip(names, seen.tolist(), strict=True):
        if anywhere:
            tensor = values[name] if name in values else empty(name)
            out[name] = _all_reduce(tensor, op)
    return out


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows of ``x`` [n_rank, features] of every rank, concatenated in rank order (ranks may hold different
    numbers of rows)."""
    if not distributed():
        return x
    import torch.distributed as dist

    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, x.cpu())
    return torch.cat(rows).to(x.device)


def broadcast_object(value, src: int):
    """``value`` of rank ``src`` on every rank (tensors travel through the host)."""
    if not distributed():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard_windows(input_ids: torch.Tensor) -> torch.Tensor:
    """This rank's calibration windows: a contiguous share, so that the ranks' shares in rank order are the
    windows in their original order."""
    rank, size = world()
    if size == 1:
        return input_ids
    if input_ids.shape[0] < size:
        raise ValueError(f"{input_ids.shape[0]} calibration windows cannot be split over {size} ranks")
    bounds = [round(i * input_ids.shape[0] / size) for i in range(size + 1)]
    return input_ids[bounds[rank] : bounds[rank + 1]]


def row_share(rows: int) -> tuple[int, int]:
    """This rank's rows [start, stop) of a matrix split over the ranks in equal shares (the last ones shorter)."""
    rank, size = world()
    share = -(-rows // size)
    return min(rank * share, rows), min((rank + 1) * share, rows)


def all_gather_shares(part: torch.Tensor, rows: int) -> torch.Tensor:
    """The ``row_share`` parts of every rank, concatenated: the whole [rows, ...] matrix on every rank, through one
    tensor collective (the shares padded to equal size)."""
    _, size = world()
    if size == 1:
        return part
    import torch.distributed as dist

    share = -(-rows // size)
    one_byte = part.element_size() == 1 and part.dtype not in (torch.uint8, torch.int8)
    data = part.view(torch.uint8) if one_byte else part  # float8 codes travel as their bytes
    padded = data.new_zeros((share, *data.shape[1:]))
    padded[: data.shape[0]] = data
    on_host = padded.is_cuda and dist.get_backend() == "gloo"
    if on_host:
        padded = padded.cpu()
    pieces = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(pieces, padded)
    whole = torch.cat(pieces)[:rows].to(part.device)
    return whole.view(part.dtype) if one_byte else whole


def broadcast_tensors(tensors: list[torch.Tensor] | None, src: int, device: torch.device) -> list[torch.Tensor]:
    """Rank ``src``'s ``tensors`` on every rank (others pass None), on ``device``: their shapes and dtypes travel as
    one small object, their contents through tensor collectives (pickling them would cost more than the solve)."""
    rank, size = world()
    if size == 1:
        return tensors
    import torch.distributed as dist

    header = broadcast_object([(t.shape, t.dtype) for t in tensors] if rank == src else None, src)
    gloo = dist.get_backend() == "gloo"
    out = []
    for i, (shape, dtype) in enumerate(header):
        tensor = tensors[i].to(device) if rank == src else torch.empty(shape, dtype=dtype, device=device)
        one_byte = tensor.element_size() == 1 and dtype not in (torch.uint8, torch.int8)
        data = tensor.view(torch.uint8) if one_byte else tensor  # float8 codes travel as their bytes
        moved = data.cpu() if gloo and data.is_cuda else data
        dist.broadcast(moved, src)
        if moved is not data:
            data.copy_(moved)
        out.append(tensor)
    return out
