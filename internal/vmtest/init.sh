#!/bin/busybox sh
# PID 1 of a vmtest guest (see doc.go): load the virtio and 9p modules, mount
# the host's root file system read-only with tmpfs over the writable places,
# mount the harness's shares, chroot and run /run/vmtest/stage2.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules); do
	insmod /lib/modules/$m || echo "vmtest: insmod $m failed"
done
opts=trans=virtio,version=9p2000.L,msize=262144
if ! mount -t 9p -o $opts,ro,cache=loose root /mnt; then
	echo "vmtest: cannot mount the host's root file system"
	poweroff -f
fi
for d in tmp run var/tmp; do
	mount -t tmpfs -o mode=1777 tmpfs /mnt/$d
done
mount --move /proc /mnt/proc
mount --move /sys /mnt/sys
mount --move /dev /mnt/dev
mkdir -p /mnt/run/vmtest
mount -t 9p -o $opts ctl /mnt/run/vmtest
# Further shares: "tag path" lines, mounted at the same path as on the host.
while read tag path; do
	mkdir -p /mnt$path && mount -t 9p -o $opts $tag /mnt$path || echo "vmtest: cannot mount $tag at $path"
done < /mnt/run/vmtest/mounts
# PID 1 itself must chroot: kernel threads, and so the module loader the
# kernel runs, share its root.
exec chroot /mnt /bin/busybox sh /run/vmtest/stage2
