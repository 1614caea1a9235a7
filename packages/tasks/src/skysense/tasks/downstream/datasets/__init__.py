"""Downstream data: label formats (class folders, GeoTIFF label masks, box CSV / JSON,
BigEarthNet's multi-label JSON), the data sets built on them (OSCD, BigEarthNet, detection
scenes, segmentation scenes, manifests of the data package), crops and collation."""
