package harness

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// pki holds the files of a cluster's throwaway credentials.
type pki struct {
	CACert, APICert, APIKey string // serving cert of the apiserver, signed by the CA
	SAKey, SAPub            string // service-account token signing key pair
	TokenFile               string // --token-auth-file
	Tokens                  map[string]string
}

// identities are the users in the token file: name -> (user, groups). Every identity is in
// system:masters so RBAC never gets in the way of a test; the kubelet also carries its node
// identity so the Node authorizer sees it as the node it is.
var identities = []struct{ key, user, groups string }{
	{"admin", "tessera-admin", "system:masters"},
	{"kube-scheduler", "system:kube-scheduler", "system:masters"},
	{"kube-controller-manager", "system:kube-controller-manager", "system:masters"},
	{"kubelet", "system:node:" + RealNodeName, "system:nodes,system:masters"},
	{"plugins", "tessera-plugins", "system:masters"},
}

func generatePKI(dir string, serviceIP net.IP) (*pki, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	p := &pki{
		CACert:    filepath.Join(dir, "ca.crt"),
		APICert:   filepath.Join(dir, "apiserver.crt"),
		APIKey:    filepath.Join(dir, "apiserver.key"),
		SAKey:     filepath.Join(dir, "sa.key"),
		SAPub:     filepath.Join(dir, "sa.pub"),
		TokenFile: filepath.Join(dir, "tokens.csv"),
		Tokens:    map[string]string{},
	}
	now := time.Now().Add(-time.Hour)
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "tessera-local-ca"},
		NotBefore:             now,
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	caCert, _ := x509.ParseCertificate(caDER)
	apiKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	apiTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "kube-apiserver"},
		NotBefore:    now,
		NotAfter:     now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), serviceIP},
	}
	apiDER, err := x509.CreateCertificate(rand.Reader, apiTmpl, caCert, &apiKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	if err := writePEM(p.CACert, "CERTIFICATE", caDER, 0o644); err != nil {
		return nil, err
	}
	if err := writePEM(p.APICert, "CERTIFICATE", apiDER, 0o644); err != nil {
		return nil, err
	}
	if err := writeECKey(p.APIKey, apiKey); err != nil {
		return nil, err
	}
	if err := writeECKey(p.SAKey, saKey); err != nil {
		return nil, err
	}
	pubDER, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return nil, err
	}
	if err := writePEM(p.SAPub, "PUBLIC KEY", pubDER, 0o644); err != nil {
		return nil, err
	}
	var csv []byte
	for i, id := range identities {
		tok, err := randomToken()
		if err != nil {
			return nil, err
		}
		p.Tokens[id.key] = tok
		csv = append(csv, fmt.Sprintf("%s,%s,uid-%d,\"%s\"\n", tok, id.user, i+1, id.groups)...)
	}
	if err := os.WriteFile(p.TokenFile, csv, 0o600); err != nil {
		return nil, err
	}
	return p, nil
}

func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode)
}

func writeECKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	return writePEM(path, "EC PRIVATE KEY", der, 0o600)
}

func randomToken() (string, error) {
	b := make([]byte, 24)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return hex.EncodeToString(b), nil
}

// kubeconfig renders a kubeconfig for server with a bearer token.
func kubeconfig(server, caFile, token, user string) []byte {
	return []byte(fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: tessera-local
  cluster:
    server: %s
    certificate-authority: %s
users:
- name: %s
  user:
    token: %s
contexts:
- name: tessera-local
  context:
    cluster: tessera-local
    user: %s
current-context: tessera-local
`, server, caFile, user, token, user))
}
