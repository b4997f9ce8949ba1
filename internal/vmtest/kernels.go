package main

// The kernels of the matrix: Debian's own generic amd64 kernel packages,
// pinned to exact versions. This table is the one place to change them.
// The packages are fetched with apt-get download from the suite named, using
// a private apt configuration (nothing is added to the host's sources), and
// unpacked with dpkg -x; nothing is installed.
var kernels = []kernel{
	{Name: "5.10", Suite: "bullseye-security", Packages: []pkg{
		{"linux-image-5.10.0-46-amd64", "5.10.262-1"},
	}},
	{Name: "6.1", Suite: "bookworm-security", Packages: []pkg{
		{"linux-image-6.1.0-57-amd64", "6.1.192-3"},
	}},
	{Name: "6.12", Suite: "trixie-security", Packages: []pkg{
		{"linux-image-6.12.118+deb13-amd64", "6.12.118-1"},
	}},
	// From 7.x Debian splits a kernel into its image and its modules.
	{Name: "7.3", Suite: "trixie-backports", Packages: []pkg{
		{"linux-binary-7.3.4+deb13-amd64", "7.3.4-1~bpo13+1"},
		{"linux-modules-7.3.4+deb13-amd64", "7.3.4-1~bpo13+1"},
	}},
}

// suites maps a suite to its archive. Only the suites the kernels name are
// given to apt.
var suites = map[string]string{
	"bullseye":          "http://deb.debian.org/debian",
	"bullseye-security": "http://deb.debian.org/debian-security",
	"bookworm":          "http://deb.debian.org/debian",
	"bookworm-security": "http://deb.debian.org/debian-security",
	"trixie":            "http://deb.debian.org/debian",
	"trixie-security":   "http://deb.debian.org/debian-security",
	"trixie-backports":  "http://deb.debian.org/debian",
}

type kernel struct {
	Name     string // short name used on the command line: 6.1
	Suite    string
	Packages []pkg
}

type pkg struct{ Name, Version string }

func findKernel(name string) (kernel, bool) {
	for _, k := range kernels {
		if k.Name == name {
			return k, true
		}
	}
	return kernel{}, false
}
