"""baton-brokerd: holds every VM's memfds and device fds, independent of any VMM."""
