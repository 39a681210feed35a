"""Flight sequences: locate the frames of one flight together and output a trajectory.

Consecutive frames of a flight are metres apart; locating each alone throws that away. This
package decodes the per-frame evidence ``cvgl locate`` computes (per-tile retrieval scores per
heading hypothesis, and verified metric fixes when a geometric stage provides them), plus the
frame-to-frame visual odometry when measured, jointly under a motion model bounded by a maximum
speed and the time between frames:

* :mod:`cvgl.track.evidence` — states (tile centres in metres), frames' evidence, and the
  calibrated robust emission log-likelihoods;
* :mod:`cvgl.track.motion` — sparse, speed-bounded transitions over tiles (KD-tree neighbours);
* :mod:`cvgl.track.heading` — (tile, heading) states for heading-search frames, odometry transitions;
* :mod:`cvgl.track.hmm` — exact Viterbi, forward filter (causal) and forward-backward (offline);
* :mod:`cvgl.track.odometry` — frame-to-frame visual odometry (OpenCV ORB + RANSAC similarity);
* :mod:`cvgl.track.particles` — a particle filter (odometry / constant velocity) and FFBSm smoother;
* :mod:`cvgl.track.shape` — rigid-shape search: the odometry-chained path placed on the map;
* :mod:`cvgl.track.decode` — one entry point and the per-frame answer (:class:`TrackPoint`);
* :mod:`cvgl.track.simulate` — simulated flights over Longmont for the sequence benchmark.

Frames are ordered (EXIF/XMP times, file names, video sampling) by :mod:`cvgl.data.frames`.
"""

from cvgl.track.decode import METHODS, Track, TrackOptions, TrackPoint, decode
from cvgl.track.evidence import EmissionModel, Fix, FrameEvidence, TileStates
from cvgl.track.heading import HeadingModel
from cvgl.track.motion import MotionModel
from cvgl.track.odometry import Odometry, measure_odometry
from cvgl.track.particles import ParticleOptions

__all__ = [
    "METHODS", "EmissionModel", "Fix", "FrameEvidence", "HeadingModel", "MotionModel", "Odometry", "ParticleOptions",
    "TileStates", "Track", "TrackOptions", "TrackPoint", "decode", "measure_odometry",
]
