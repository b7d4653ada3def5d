"""What rwproxy tells its operators: per-statement statistics recorded in each worker
(recorder.py), merged across workers in the control plane (merge.py), served as Prometheus
metrics and health checks over HTTP (metrics.py, http.py), and the events log (events.py).
The admin SQL port (proxy/admin/) reads the same merged figures."""
