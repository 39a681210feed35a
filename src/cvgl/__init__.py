"""cvgl: cross-view geo-localization (zero-shot VFM-Loc today; trained GenGeo on the same encoder next)."""

__version__ = "0.1.0"
