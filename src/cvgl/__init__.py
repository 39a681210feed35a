"""cvgl: cross-view geo-localization (zero-shot VFM-Loc and trained GenGeo as one toolkit)."""

__version__ = "0.1.0"
