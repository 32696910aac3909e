"""skunq web: a live monitor in the browser and a Prometheus endpoint for SkunkQueue."""
