"""What the tests build on, written once: the tiny settings (tiny.py), scans on disk (nifti_cases.py,
dicom_cases.py), real Flower messages, replies and the real strategy (messages.py), the in-process federation
(local_grid.py), a scripted SuperLink under the centre's receiving stack (scripted_grid.py), one site's
handlers (site_harness.py), a trained round for replaying hostile replies (hostile.py), deployed
processes (deploy_harness.py), the session's deployed federation (deployed.py), the user's own sites
(own_sites.py), a Ray cluster started apart and the cyclic run on it (ray_head.py) and fedseg installed as the
containers install it (installed.py)."""
