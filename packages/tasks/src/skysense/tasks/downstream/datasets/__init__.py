"""Downstream data: label formats (GeoTIFF label masks, box CSV / JSON), the scenes built on
them (detection scenes, segmentation scenes, manifests of the data package), crops and
collation; :mod:`public` wires the public datasets of :mod:`skysense.data.datasets` (OSCD,
BigEarthNet, EuroSAT, LEVIR-CD, ...) into fine-tuning."""
