"""The segmentation service: unified profiles, audiences, memberships."""
