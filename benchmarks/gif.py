"""A short, small GIF of a recorded episode, for the README (GitHub shows GIFs inline, not MP4s).

    python benchmarks/gif.py videos/RUN/eval-0-episode-0.mp4 benchmarks/results/videos/Hopper-v5.gif

Needs moviepy (pip install moviepy); `benchmarks/videos.sh` makes every GIF the README shows.
"""

import argparse
import os
import sys

try:
    from moviepy import VideoFileClip
except ImportError:
    print("gif.py: needs moviepy: pip install moviepy", file=sys.stderr)
    sys.exit(2)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("video")
    p.add_argument("gif")
    p.add_argument("--width", type=int, default=240, help="pixels; the height keeps the aspect ratio")
    p.add_argument("--fps", type=int, default=15)
    p.add_argument("--seconds", type=float, default=8.0, help="at most this much of the start of the episode")
    a = p.parse_args()
    clip = VideoFileClip(a.video)
    clip = clip.subclipped(0, min(a.seconds, clip.duration)).resized(width=a.width)
    clip.write_gif(a.gif, fps=a.fps, logger=None)
    print(f"{a.gif}: {os.path.getsize(a.gif) / 1e6:.2f} MB, {clip.duration:.1f} s")


if __name__ == "__main__":
    main()
