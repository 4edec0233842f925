"""FD-<network>: the Frechet distance on a fairsynth classifier's penultimate features, per subgroup, with the
inter-subgroup variance (fairness/fid.py, which computes it, on the features of a network loaded here).

    python -m classify.domain_fd REAL FAKE --domain-ckpt CKPT [--groups CSV] [--json OUT] [--force]

REAL and FAKE as for fairness.fid (folders of images, or .npz files with a uint8 `images` array and optionally
`groups`); CKPT: a classifier checkpoint of this project (classify.train_classifier, train_chexnet, ...). The
network sees the images resized to its input size (classify.nets.FeatureExtractor). A distance without ImageNet
weights, comparable only between runs that use the same checkpoint and the same n.
"""
import argparse

import torch

from classify.nets import load_feature_extractor
from common.cli import ArgumentParser, run
from common.runs import write_json
from fairness.fid import add_args, check_json, distances, read_pair


def main(args):
    # the inputs read and checked before the network is loaded and anything is computed
    (xr, gr), (xf, gf) = read_pair(args.real, args.fake, args.groups)
    check_json(args.json, args.force)
    net, label = load_feature_extractor(args.domain_ckpt)
    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    result = distances(net, label, (args.real, xr, gr), (args.fake, xf, gf), args.sqrtm, device)
    if args.json:
        write_json(args.json, result)
    return result


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m classify.domain_fd", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    p.add_argument("--domain-ckpt", required=True, help="a fairsynth classifier ckpt.pt: FD on its penultimate "
                                                        "features")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(main, parse_args)
