"""Images that are read by region: ordinary photos, tiled/pyramidal TIFFs, whole-slide files.

Why an abstraction: the engine must never hold a gigapixel image. It asks an
:class:`ImageSource` for the pixels of one trunk tile (or one batch of windows) at a time,
at the pyramid level it works on, and drops them after. Three readers, picked by the file's
content (never its name):

* ``openslide`` - whole-slide formats OpenSlide recognises by content other than its
  "generic-tiff" catch-all (Aperio SVS, Hamamatsu NDPI, Philips TIFF, Ventana, Leica...);
  needs a local path (an uploaded file or a ``file://`` URL);
* ``tifffile`` - tiled or striped TIFF, BigTIFF, pyramidal TIFF (SubIFDs or one page per
  level), OME-TIFF, GeoTIFF, and any TIFF above the ordinary pixel limit: its zarr store
  decodes only the tiles (or strips) a region touches, with ``imagecodecs`` codecs;
* ``pillow`` - everything else the service accepts (JPEG, PNG, WebP, BMP, small single-page
  TIFF), exactly as :mod:`shared.image_sources.pillow_decoder` reads them (same limits, colour rules, EXIF).

Region readers have their own, much larger pixel limit (``max_region_pixels``) because they
are never decoded whole; headers that lie (pages past the end of the file, absurd tile
sizes, pyramids of thousands of levels) are refused when the file is opened.

All coordinates given to :meth:`ImageSource.read_region` are pixels *of that level*.
"""

# The modules: ``source_types`` (the types every reader shares), one module per reader
# (``pillow_source`` over ``pillow_decoder``, ``tiff_source``, ``slide_source``) and
# ``source_opener``, the one place that picks a reader; no reader imports the opener.
