"""Score grid -> files (no Keras): heatmap.npz, summary.json, overlays, Deep Zoom heat
pyramids, heatmap.tif and regions.geojson, written atomically under the job's key."""
