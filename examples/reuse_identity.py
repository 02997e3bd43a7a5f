"""Save an identity once, generate from it later without any face work (or on another machine).

Usage: python examples/reuse_identity.py [--model tiny|DIR] [--face IMG ...] [--out DIR] [--steps N]
Several --face photos of the same person are combined into one identity (see lcmla_sdk/identity.py).
The same works from the shell: `lcmla identity create --face IMG --out id.safetensors` and
`lcmla generate --identity id.safetensors --prompt "..."`.
"""

import argparse
from pathlib import Path

from lcmla_sdk import Personalizer
from lcmla_sdk.images import sample_face

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="tiny")
parser.add_argument("--face", type=Path, action="append", help="face photo; repeat for several (default: sample)")
parser.add_argument("--out", type=Path, default=Path("outputs/reuse_identity"))
parser.add_argument("--steps", type=int, help="denoising steps (default: by mode)")
args = parser.parse_args()
args.out.mkdir(parents=True, exist_ok=True)

# 1. Encode and save: image tokens, face latent distribution, ArcFace embedding (with a face pack), source hashes.
personalizer = Personalizer.from_pretrained(args.model)
identity_file = personalizer.encode_face(args.face or [sample_face()]).save(args.out / "identity.safetensors")
print(identity_file)

# 2. Later: load it for the same model (an identity made by another model is refused) and generate.
identity = personalizer.load_identity(identity_file)
print(f"{identity.num_references} reference photo(s), made for model {identity.model_fingerprint[:12]}")
for seed in (0, 1):
    image = personalizer.generate(identity, "A pencil sketch of a face", seed=seed, steps=args.steps)[0]
    path = args.out / f"sketch-seed{seed}.png"
    image.save(path)
    print(path)
