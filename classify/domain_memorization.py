"""The memorization audit (fairness/memorization.py) with its feature-space part: each synthetic image's nearest
training image also by the cosine distance of a fairsynth classifier's penultimate features, loaded here.

    python -m classify.domain_memorization SYNTH TRAIN --feature-ckpt CKPT [--threshold 0.02] [--out DIR] [--force]

Writes memorization.json (the pixel audit's numbers plus feature_nn_cosine_distance and
feature_nn_agrees_with_pixel_nn) and closest_pairs.png into --out, as fairness.memorization does.
"""
import argparse

from classify.nets import load_feature_extractor
from common.cli import ArgumentParser, run
from fairness.fid import extract
from fairness.memorization import add_args, out_folder, read_inputs, write_audit


def main(args):
    # the inputs read and checked, the network loaded, and the output place checked before anything is computed
    synth, train = read_inputs(args.synth, args.train)
    net, _ = load_feature_extractor(args.feature_ckpt)
    out = out_folder(args.out, args.force)
    return write_audit(synth, train, out, args.threshold, args.title, feature_fn=lambda x: extract(net, x))


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m classify.domain_memorization", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    p.add_argument("--feature-ckpt", required=True, help="classifier ckpt.pt for the feature-space nearest neighbour")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(main, parse_args)
