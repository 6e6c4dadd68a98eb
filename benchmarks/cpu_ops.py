"""Four CPU measurements behind design choices in model.py and inference.py, recorded rather than remembered.

1. tanh against sigmoid over an attention energy tensor (K beams x P cells x A): SoftAttention computes the
   paper's w^T tanh(u) through sigmoid, which gives the same alpha (tests/test_model.py).
2. The ResNet-50 encoder's time per image by batch size at inference, at 224 and 448 px: inference.encode_images
   runs CPU batches in chunks of CPU_CHUNK_PIXELS input pixels.
3. torch.ao's dynamically quantized Linear and LSTMCell modules (activations scaled per batch), their ops called
   directly, and inference.Int8Linear / Int8LSTMCell (input ranges calibrated once, so a photo's caption does
   not depend on its batch), at the decoder's sizes over one photo's 3 beams.
4. One batched attention step without grad (32 photos x 3 beams, 14x14 cells): the energies as one tensor
   (model.SoftAttention), in cache-sized chunks, and in chunks in the product form (inference.energy_scores).

Each figure is the median over --repeats rounds, the sizes interleaved within a round (the machine is shared).

    python benchmarks/cpu_ops.py --out results/cpu_ops.json
"""

from __future__ import annotations

import sys
import warnings

import torch
from harness import add_threads, begin_record, benchmark_parser, finish, interleaved, median, seconds
from torch import nn

import show_attend_tell.inference as inference
from show_attend_tell.config import ModelConfig
from show_attend_tell.inference import CPU_CHUNK_PIXELS, Int8Linear, Int8LSTMCell, energy_scores, product_terms
from show_attend_tell.model import Encoded, Encoder, SoftAttention, attend


def activations(repeats: int) -> dict:
    """Median ns per element of tanh and sigmoid (in place, as SoftAttention runs it) for 1 and 32 photos."""
    results = {}
    for rows in (3, 96):  # beam 3 for one photo; for 32 photos
        x = torch.randn(rows, 49, 512)
        timings: dict[str, list[float]] = {"tanh": [], "sigmoid": []}
        for _ in range(repeats):
            for name, op in (("tanh", torch.tanh_), ("sigmoid", torch.sigmoid_)):
                work = x.clone()
                timings[name].append(seconds(lambda op=op, work=work: op(work)) * 1e9 / x.numel())
        medians = {name: median(values, digits=3) for name, values in timings.items()}
        results[f"{rows}x49x512"] = {
            "ns_per_element_median": medians,
            "tanh_over_sigmoid": round(medians["tanh"] / medians["sigmoid"], 2),
        }
    return results


def encoder_batches(repeats: int, side: int, sizes: tuple[int, ...]) -> dict:
    """Median ms per image of the (random-weight) ResNet-50 trunk at `side` px, one forward per batch size."""
    encoder = Encoder(ModelConfig(vocab_size=10), pretrained=False).eval()
    x = torch.randn(max(sizes), 3, side, side)
    with torch.inference_mode():
        encoder.trunk(x[:2])  # warm-up
        timings = interleaved({size: lambda _, size=size: encoder.trunk(x[:size]) for size in sizes}, repeats).seconds
    return {f"batch_{size}": median(values, scale=1e3 / size, digits=1) for size, values in timings.items()}


def int8_layers(repeats: int, calls: int = 200) -> dict:
    """Median us per call for 3 rows (one photo's beams) at the shipped decoder's sizes, L_o (512 -> 2542) and
    the LSTMCell (1024 + 512 -> 512): torch.ao's dynamic int8 modules, their ops called directly, and the
    calibrated (static) int8 layers that inference.Int8Decoder uses."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32 = nn.ModuleList([nn.Linear(512, 2542), nn.LSTMCell(1024, 512)])
        linear, cell = torch.ao.quantization.quantize_dynamic(fp32, {nn.Linear, nn.LSTMCell}, dtype=torch.qint8)
    x, inputs, state = torch.randn(3, 512), torch.randn(3, 1024), (torch.randn(3, 512), torch.randn(3, 512))
    packed = linear._packed_params._packed_params
    cell_weights = (cell._packed_weight_ih, cell._packed_weight_hh, cell.bias_ih, cell.bias_hh)

    def calibrated(name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
        seen = {"input_gates": inputs, "hidden_gates": state[0]}.get(name, x)  # the inputs timed below
        return Int8Linear(weight, bias, seen.amin(0), seen.amax(0))

    static_linear = calibrated("L_o", fp32[0].weight, fp32[0].bias)
    static_cell = Int8LSTMCell(fp32[1], calibrated)
    calls_by_name = {
        "linear_torch_ao": lambda: linear(x),
        "linear_direct": lambda: torch.ops.quantized.linear_dynamic.default(x, packed, True),
        "linear_static": lambda: static_linear(x),
        "lstm_cell_torch_ao": lambda: cell(inputs, state),
        "lstm_cell_direct": lambda: torch.ops.quantized.quantized_lstm_cell_dynamic.default(
            inputs, state, *cell_weights
        ),
        "lstm_cell_static": lambda: static_cell(inputs, state),
    }

    def repeated(call) -> None:
        for _ in range(calls):
            call()

    with torch.inference_mode():
        timings = interleaved({name: lambda _, c=call: repeated(c) for name, call in calls_by_name.items()}, repeats)
    medians = {name: median(values, scale=1e6 / calls, digits=1) for name, values in timings.seconds.items()}
    return {
        "us_per_call_median": medians,
        "python_overhead_us": {
            "linear": round(medians["linear_torch_ao"] - medians["linear_direct"], 1),
            "lstm_cell": round(medians["lstm_cell_torch_ao"] - medians["lstm_cell_direct"], 1),
        },
        "static_over_direct": {
            "linear": round(medians["linear_static"] / medians["linear_direct"], 2),
            "lstm_cell": round(medians["lstm_cell_static"] / medians["lstm_cell_direct"], 2),
        },
    }


def attention_step(repeats: int, calls: int = 5) -> dict:
    """Median ms of one attention call without grad over 32 photos x 3 beams on a 14x14 grid (A = 512)."""
    attention = SoftAttention(feature_dim=512, decoder_dim=512, attention_dim=512).eval()
    features, h = torch.randn(32, 196, 512), torch.randn(96, 512)
    w = attention.score.weight

    def one_tensor() -> None:
        attention(Encoded(features, terms), h)

    def chunks(product: bool) -> None:
        hidden = attention.decoder_projection(h).mul(2).view(32, 3, 1, 512)
        if product:
            hidden = product_terms(hidden)
        attend(energy_scores(exp_terms if product else terms, hidden, w, product=product), features)

    forms = {"one_tensor": one_tensor, "chunks": lambda: chunks(False), "chunks_product_form": lambda: chunks(True)}
    with torch.inference_mode():
        terms = attention.project(features)
        exp_terms = product_terms(terms)
        timings = interleaved({n: lambda _, f=form: [f() for _ in range(calls)] for n, form in forms.items()}, repeats)
    return {
        "energy_chunk_bytes": inference.ENERGY_CHUNK_BYTES,
        **{n: median(v, scale=1e3 / calls, digits=2) for n, v in timings.seconds.items()},
    }


def main() -> int:
    parser = benchmark_parser(__doc__, record="cpu_ops.json")
    parser.add_argument("--repeats", type=int, default=7)
    add_threads(parser)
    parser.add_argument("--sides", type=int, nargs=2, default=[224, 448], help="encoder input sides (default 224 448)")
    args = parser.parse_args()
    record = begin_record(args)
    record["activations"] = activations(args.repeats * 5)
    record["encoder_ms_per_image"] = encoder_batches(args.repeats, args.sides[0], (1, 2, 4, 8, 16, 32))
    record["encoder_ms_per_image_448px"] = encoder_batches(args.repeats, args.sides[1], (1, 2, 4, 8))
    record["encoder_cpu_chunk_pixels"] = CPU_CHUNK_PIXELS
    record["int8_layers_3_rows"] = int8_layers(args.repeats * 3)
    record["attention_step_32x3_rows_14x14"] = attention_step(args.repeats * 3)
    return finish(record, args.out)


if __name__ == "__main__":
    sys.exit(main())
