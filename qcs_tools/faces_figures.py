"""The figures of docs/faces.md: the detector on scikit-image's photographs, the landmark
error on drawn faces, the detection rate on the built-in data (MTCNN and OpenCV's Haar
cascade), and faces per second of detection + alignment on this machine's CPU.

    python -m qcs_tools.faces_figures [--drawn 30] [--builtin 100] [--threads 2]

Needs scikit-image (the test extra) and, for the Haar column, opencv-python-headless 4.x.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from face_helpers import drawn_face, photos, place, similarity
from qcs.faces import Detector, HaarDetector, align_face, rotate_image


def photo_table(det: Detector) -> None:
    """One line per photograph: faces found, their score, roll and landmarks."""
    p = photos()
    a = p["astronaut"]
    cases = {"astronaut": a, "astronaut rotated 25": rotate_image(a, 25)[0],
             "astronaut rotated -25": rotate_image(a, -25)[0],
             "astronaut shrunk to 128 px": np.asarray(Image.fromarray(a).resize((128, 128),
                                                                                Image.LANCZOS)),
             "collage (astronaut + mirror)": np.concatenate([a, a[:, ::-1]], axis=1),
             "coffee": p["coffee"], "cat": p["cat"]}
    print("| photograph | size | faces | score | roll (deg) | found in copy rotated by |")
    print("|---|---|---|---|---|---|")
    for name, img in cases.items():
        faces = det.detect([img])[0]
        print(f"| {name} | {img.shape[1]}x{img.shape[0]} | {len(faces)} | "
              + ", ".join(f"{f.score:.3f}" for f in faces) + " | "
              + ", ".join(f"{f.roll():+.1f}" for f in faces) + " | "
              + ", ".join(f"{f.angle:+.0f}" for f in faces) + " |")
        for f in faces:
            print("|  | landmarks | " + " ".join(f"({x:.0f}, {y:.0f})" for x, y in f.landmarks)
                  + " | | | |")


def drawn_error(det: Detector, n: int) -> None:
    """Mean landmark error on drawn faces rotated +-40 degrees and scaled 0.6-1.6."""
    rng = np.random.default_rng(0)
    errs, nme, missed = [], [], 0
    for i in range(n):
        face, pts = drawn_face(100, seed=i)
        m = similarity(rng.uniform(-40, 40), rng.uniform(0.6, 1.6), (0, 0))
        m[:, 2] = rng.uniform(140, 180, 2) - m[:, :2] @ [50, 65]
        img, truth = place(face, pts, m, (320, 320))
        faces = det.detect([img])[0]
        if len(faces) != 1:
            missed += 1
            continue
        e = np.linalg.norm(faces[0].landmarks - truth, axis=1)
        errs.append(e)
        nme.append(e.mean() / np.linalg.norm(truth[1] - truth[0]))
    errs = np.array(errs)
    names = ["left eye", "right eye", "nose", "left mouth", "right mouth"]
    print(f"drawn faces: {n - missed}/{n} found once; mean error px: "
          + ", ".join(f"{k} {v:.2f}" for k, v in zip(names, errs.mean(0)))
          + f"; all points {errs.mean():.2f} px; "
          f"normalised by the eye distance {np.mean(nme):.3f}")


def builtin_rate(det: Detector, per_class: int) -> None:
    """Share of the built-in test images with a face found, MTCNN vs Haar."""
    from qcs.data.synth import SynthParams, generate
    with tempfile.TemporaryDirectory() as tmp:
        root = generate(tmp, SynthParams(train_per_class=0, test_per_class=per_class))
        rows = [json.loads(s) for s in (root / "synth_factors.jsonl").read_text().splitlines()]
        imgs = [np.asarray(Image.open(root / "Image" / "aligned"
                                      / f"{r['name'][:-4]}_aligned.jpg").convert("RGB"))
                for r in rows]
    upright = Detector(angles=()).detect(imgs)
    rotated = det.detect(imgs)
    def eye_err(found):
        return 100 * np.mean([np.linalg.norm(f[0].landmarks[:2] / 100 - np.array(r["eyes"]),
                                             axis=1).mean() for f, r in zip(found, rows) if f])
    line = (f"built-in data ({len(imgs)} test images, 100 px): MTCNN upright "
            f"{sum(map(bool, upright)) / len(imgs):.1%} (eye error {eye_err(upright):.2f} px), "
            f"with the rotated copies {sum(map(bool, rotated)) / len(imgs):.1%} (eye error "
            f"{eye_err(rotated):.2f} px)")
    try:
        haar = HaarDetector().detect(imgs)
        line += f"; Haar cascade {sum(map(bool, haar)) / len(imgs):.1%}"
    except ImportError as exc:
        line += f"; Haar not measured ({exc})"
    print(line)


def speed(det: Detector, batch: int) -> None:
    """Faces per second: detection + alignment to 100 px, batches of ``batch`` images."""
    a = photos()["astronaut"]
    sizes = {"astronaut 512x512": a,
             "astronaut in 640x480": np.pad(a, ((0, 0), (64, 64), (0, 0)))[16:496],
             "face crop 100x100": np.asarray(Image.fromarray(a[40:200, 150:300]).resize(
                 (100, 100), Image.LANCZOS))}
    for name, img in sizes.items():
        imgs = [img] * batch
        det.detect(imgs[:1])  # warm-up
        t, cpu = time.perf_counter(), time.process_time()
        faces = det.detect(imgs)
        n = 0
        for im, fs in zip(imgs, faces):
            pil = Image.fromarray(im)
            for f in fs:
                align_face(pil, f.landmarks, 100)
                n += 1
        dt, dcpu = time.perf_counter() - t, time.process_time() - cpu
        # the CPU time is less sensitive than the wall time to other work on the machine
        print(f"speed, {name}: {n} faces in {dt:.2f} s = {n / dt:.1f} faces/s; "
              f"{dcpu:.2f} CPU-s = {n / dcpu:.1f} faces per CPU-second ({batch} images per "
              f"call, {torch.get_num_threads()} threads, load average "
              f"{os.getloadavg()[0]:.0f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drawn", type=int, default=30, help="drawn faces to place")
    ap.add_argument("--builtin", type=int, default=100, help="built-in test images per class")
    ap.add_argument("--batch", type=int, default=16, help="images per detect call (speed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["photos", "drawn", "builtin", "speed"], default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    det = Detector()
    steps = {"photos": lambda: photo_table(det), "drawn": lambda: drawn_error(det, args.drawn),
             "builtin": lambda: builtin_rate(det, args.builtin),
             "speed": lambda: speed(det, args.batch)}
    for name, step in steps.items():
        if args.only in (None, name):
            step()


if __name__ == "__main__":
    main()
