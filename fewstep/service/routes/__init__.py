"""The gateway's routes, one router per resource: health, models, images, jobs, admin, video, and the
playground page."""
